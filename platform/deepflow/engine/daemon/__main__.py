import sys

from deepflow.engine.daemon.main import main

sys.exit(main())
