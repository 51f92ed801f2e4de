# Before any config is loaded: every config file is read strictly (one message, no traceback, for a
# key given twice, which YAML would settle silently, or text that is not UTF-8).
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from kvsweep.study.config_files import read_config_file  # noqa: E402
from kvsweep.core.errors import KvsweepError  # noqa: E402


for _path in workflow.overwrite_configfiles or ["config.yaml"]:
    try:
        read_config_file(_path)
    except KvsweepError as _err:
        print(f"invalid config: {_err}", file=sys.stderr)
        raise SystemExit(1)
