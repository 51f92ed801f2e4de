"""Task name -> its work. One entry per task module."""

from kvsweep.tasks.perplexity import PERPLEXITY
from kvsweep.tasks.perplexity_kvpress import PERPLEXITY_KVPRESS
from kvsweep.tasks.summarization import SUMMARIZATION
from kvsweep.tasks.summarization_kvpress import SUMMARIZATION_KVPRESS

WORK = {work.task.name: work for work in (PERPLEXITY, SUMMARIZATION, PERPLEXITY_KVPRESS, SUMMARIZATION_KVPRESS)}
