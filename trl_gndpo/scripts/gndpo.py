"""What `trl-gndpo --accelerate_config ... --num_processes N` runs in each process (see `trl_gndpo.cli`): the training
options, parsed and run as `trl-gndpo` does; `--config` keys meant for `accelerate launch` are ignored here."""

from trl_gndpo.cli import run

if __name__ == "__main__":
    run(fail_with_unknown_args=False)
