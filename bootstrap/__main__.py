import sys

from helix_p2p.bootstrap.cli import main

sys.exit(main())
