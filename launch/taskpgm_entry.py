"""The `taskpgm` command, for Ray jobs whose nodes need not have taskpgm_ray installed.

`launch/submit.sh` uploads the repository as the job's working directory and runs
`python launch/taskpgm_entry.py ARGS...`, which is `taskpgm ARGS...` from the uploaded code: the
working directory goes first on sys.path, so it wins over any installed copy of the package.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from taskpgm_ray.cli import main

    sys.exit(main())
