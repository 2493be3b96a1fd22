import sys

from gpuserver.unified_server import main

sys.exit(main())
