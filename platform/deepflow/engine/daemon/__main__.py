import sys

from deepflow.engine.daemon.serve import main

sys.exit(main())
