import sys

from glmjax.cli import main

sys.exit(main())
