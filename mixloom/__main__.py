"""`python -m mixloom`: the `mixloom` command, as torchrun launches it
(`torchrun --nproc-per-node 2 -m mixloom train CONFIG`)."""

import sys

from mixloom.cli import main

sys.exit(main())
