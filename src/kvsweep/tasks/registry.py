"""Name -> task. One entry per task file."""

from kvsweep.tasks.perplexity import PERPLEXITY
from kvsweep.tasks.summarization import SUMMARIZATION

TASKS = {task.name: task for task in (PERPLEXITY, SUMMARIZATION)}
