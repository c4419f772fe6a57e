"""``python -m hedgehog ...`` (and ``accelerate launch -m hedgehog ...``): the same as the ``hedgehog`` command."""
import sys

from hedgehog.cli import main

sys.exit(main())
