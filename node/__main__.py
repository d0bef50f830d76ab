import sys

from helix_p2p.node.cli import main

sys.exit(main())
