"""`python -m modelapp_operator.cli`: the `modelapp` command."""

import sys

from modelapp_operator.cli.main import main

sys.exit(main())
