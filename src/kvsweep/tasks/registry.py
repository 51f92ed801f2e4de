"""Task name -> its work. One entry per task module."""

from kvsweep.tasks.perplexity import PERPLEXITY
from kvsweep.tasks.summarization import SUMMARIZATION

WORK = {work.task.name: work for work in (PERPLEXITY, SUMMARIZATION)}
