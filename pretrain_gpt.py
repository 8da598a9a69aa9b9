"""Pretrain a GPT on megatron-core: `python pretrain_gpt.py --help` lists every option (Megatron-LM flag names).

Runs as a single process, or under torchrun, mpiexec/mpirun or srun: ranks are discovered from the launcher.
"""

import sys

from megatron_ext.platform import quiet_optional_dependency_warnings

quiet_optional_dependency_warnings()  # before megatron-core is imported, here and in spawned checkpoint writers

from megatron_ext.training.loop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
