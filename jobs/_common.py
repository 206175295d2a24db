"""Shared bits of the job entry points: the repo importable when run as `python jobs/x.py`; exit statuses."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run(main, tag: str) -> None:
    """Exit with a clear status: 0 done (or main's own code), 2 bad arguments / config / input (one line that
    names the problem), 4 the work itself failed (the last line says why, for `ray job logs`)."""
    from ldm.config import ConfigError
    try:
        sys.exit(main())
    except (ConfigError, FileNotFoundError, PermissionError, ValueError) as e:
        print(f"[{tag}] error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"[{tag}] interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001
        print(f"[{tag}] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(4)
