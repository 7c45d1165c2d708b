"""The `disttrain` command: train, eval, plot, export, info, config, bench.

Every command runs the same way plainly (one process) or under `mpiexec -n N` / `srun`: MPI is
initialised inside the command, never at import. Errors a user can cause are printed once (by rank 0)
as `disttrain: error: ...` with exit code 1 (2 for command-line usage); no rank is left waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading

AGREED_EXIT_GRACE_SECONDS = 20  # MPI_Finalize of every rank normally takes well under a second
# where launchers put a process's rank: read by commands that never initialise MPI (export, plot)
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")

# trained by `disttrain train` without a config (and by `make run`); shipped inside the package
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "digits_mlp.toml")

EPILOG = """examples:
  disttrain train                                               the bundled default example (digits MLP)
  disttrain train examples/digits_mlp.toml                      one process
  mpiexec -n 4 disttrain train examples/digits_mlp.toml         4 ranks (the venv's MPICH)
  srun --mpi=pmi2 -n 4 disttrain train examples/digits_mlp.toml SLURM
  disttrain train CONFIG --set training.epochs=5 --set optimizer.lr=0.003
  disttrain train CONFIG --resume                               continue from the latest checkpoint
  disttrain eval runs/digits-mlp                                test metrics of the latest checkpoint
  disttrain plot runs/digits-mlp                                PNG of loss/accuracy against steps
  disttrain export runs/digits-mlp model.npz                    parameters as a plain .npz
  disttrain sample runs/gpt-stdlib --prompt "def " --tokens 200  text from a GPT run's latest checkpoint
  disttrain config                                              every config key, default and rule
"""


def main(argv=None) -> int:
    """Entry point of the `disttrain` console script and `python -m disttrain`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own options (and --help): hand them all over
        from .bench.runner import main as bench_main

        return bench_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = argv  # every rank must have been given the same: checked by `train`
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = args.run(args)
        sys.stdout.flush()  # here, not at exit, so that a closed stdout is handled below
    except BrokenPipeError:  # the reader went away (`disttrain info | head -1`): nothing more to say
        _drop_stdout()
        return 1
    return code


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so Python's final flush of what is still buffered does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def launcher_rank() -> int:
    """This process's rank in an MPI/SLURM job as the launcher's environment says (0 outside a job),
    found without initialising MPI."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="disttrain", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Data-parallel training on CPUs: numpy autograd, MPI, ZeRO-1 sharded optimizers.")
    parser.add_argument("--version", action="version", version=f"disttrain {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train a model described by a TOML config",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                                usage="disttrain train [-h] [CONFIG.toml] [--set SECTION.KEY=VALUE] [--resume [PATH]] "
                                      "[--run-dir RUN_DIR]")
    # optional: without it the bundled default example trains; `train --resume CONFIG.toml` (the flag
    # took the config) is told apart from that in _train_arguments
    train.add_argument("config", nargs="?", metavar="CONFIG.toml",
                       help="TOML file with [model], [data], [optimizer], [training], [checkpoint] (default: the "
                            "bundled example, an MLP on the digits)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config key (repeatable), e.g. --set training.epochs=5")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                       help="continue from the latest good checkpoint of the run (or from PATH)")
    train.add_argument("--run-dir", help="where metrics.jsonl and checkpoints go (training.run_dir)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluate the latest (or a given) checkpoint on the test set")
    evaluate.add_argument("path", help="run directory, checkpoint directory, or one step-XXXXXXXX checkpoint")
    evaluate.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                          help="override a key of the config recorded in the checkpoint")
    evaluate.set_defaults(run=_eval)

    plot = commands.add_parser("plot", help="PNG of training/test loss and accuracy (needs matplotlib)")
    plot.add_argument("path", help="run directory (metrics.jsonl) or a benchmark JSON file")
    plot.add_argument("-o", "--output", help="PNG path (default: next to the input)")
    plot.set_defaults(run=_plot)

    sample = commands.add_parser("sample", help="generate text from the latest checkpoint of a GPT run")
    sample.add_argument("path", help="run directory, checkpoint directory, or one step-XXXXXXXX checkpoint")
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample.add_argument("--tokens", type=_positive_int, default=200, help="bytes to generate (default 200)")
    sample.add_argument("--temperature", type=_positive_float, default=0.8,
                        help="softmax temperature, > 0 (default 0.8; lower is more conservative)")
    sample.add_argument("--top-k", type=_non_negative_int, default=40,
                        help="sample among the k most likely bytes only (0: all; default 40)")
    sample.add_argument("--seed", type=_non_negative_int, default=0, help="random seed: the same seed, the same text")
    sample.set_defaults(run=_sample)

    export = commands.add_parser("export", help="write the latest checkpoint's parameters as a plain .npz")
    export.add_argument("path", help="run directory, checkpoint directory, or one checkpoint")
    export.add_argument("output", help="output .npz")
    export.add_argument("--optimizer", action="store_true", help="also write the full optimizer state")
    export.set_defaults(run=_export)

    info = commands.add_parser("info", help="versions, MPI library, world size, nodes, BLAS and threads")
    info.set_defaults(run=_info)

    show = commands.add_parser("config", help="print every config key with its default and allowed values")
    show.set_defaults(run=lambda args: _print_schema())

    commands.add_parser("bench", help="throughput benchmark against hand-written numpy and PyTorch "
                        "(`disttrain bench --help` for its options)")
    for choice in commands._choices_actions:  # each command's own --help opens with what it does
        commands.choices[choice.dest].description = commands.choices[choice.dest].description or choice.help
    return parser


# ------------------------------------------------------------------------------------------ errors
def _agreed_errors() -> tuple:
    """Errors raised identically on every rank: from the same config and data, or agreed collectively."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .datasets import DataError
    from .distributed import LaunchError, ModelMismatchError
    from .training import TrainingError
    from .training.run_lock import RunDirLockedError

    return (ConfigError, DataError, CheckpointError, TrainingError, ModelMismatchError, LaunchError, RunDirLockedError)


def _fail(comm, error: Exception, agreed: bool = True) -> int:
    """Report a user-caused error and end this rank with exit code 1, leaving no rank waiting.

    An agreed error (raised identically on every rank) is printed once, by rank 0, and every rank then
    exits normally: no MPI abort, so no launcher noise after the one line. Should a rank that believed
    the error agreed still be alive after a grace period (the others are not ending), it prints the
    error itself, prefixed with its rank, and aborts the job. Any other error is printed by the rank that
    raised it and aborts the job at once (the other ranks may be inside a collective).
    """
    message = f"disttrain: error: {error}"
    if comm is None or comm.size == 1:
        print(message, file=sys.stderr, flush=True)
        return 1
    if not agreed:
        comm.error(message)
        comm.abort(1)
        return 1
    if comm.rank == 0:
        print(message, file=sys.stderr, flush=True)

    def backstop():
        comm.error(message + " (the other ranks did not stop with it: aborting)")
        comm.abort(1)
    timer = threading.Timer(AGREED_EXIT_GRACE_SECONDS, backstop)
    timer.daemon = True  # a normal exit ends it unfired
    timer.start()
    return 1


def _guarded(command):
    """Run command(comm) with user errors turned into a clean message and exit code 1."""
    comm = None
    try:
        from .distributed import init

        comm = init()
        return command(comm)
    except _agreed_errors() as error:
        return _fail(comm, error)
    except ValueError as error:  # bad input found on this rank alone, perhaps
        return _fail(comm, error, agreed=False)
    except BrokenPipeError:  # stdout's reader went away: end quietly, and end the job (others may be waiting)
        _drop_stdout()
        if comm is not None and comm.size > 1:
            comm.abort(1)
        return 1


# ------------------------------------------------------------------------------------------ train
def _train(args) -> int:
    from .config import load_config
    from .training import Trainer, build_run, catch_stop_signals
    from .training.agreement import check_agreement, run_facts
    from .training.signals import INTERRUPT_EXIT_CODE, ignore_stop_signals

    _train_arguments(args)
    catch_stop_signals()  # a batch system's warning signal may come while the data loads

    overrides = list(args.set) + ([f"training.run_dir={json.dumps(args.run_dir)}"] if args.run_dir else [])

    def command(comm):
        if args.config is None and comm.rank == 0:
            print(f"disttrain: no config given: training the bundled default example ({DEFAULT_CONFIG})", flush=True)
        config = load_config(args.config or DEFAULT_CONFIG, overrides)
        check_agreement(comm, run_facts(config, argv=args.argv))  # before the ranks load data
        model, train, test, loss_fn, info = build_run(config, comm)
        if comm.rank == 0:
            print(f"disttrain: {config['model']['name']} on {info['description']}", flush=True)
            for note in info.get("notes", []):
                print(note, flush=True)
        trainer = Trainer(model, train, loss_fn, test, comm, config["optimizer"], config["training"],
                          config["checkpoint"], config=config, task=info["task"],
                          resume_command=resume_command(args))
        # an explicit PATH goes through as given: the trainer refuses one that holds no checkpoint,
        # while a bare --resume (True) on a run dir without checkpoints starts fresh (a requeued job)
        summary = trainer.fit(resume=args.resume)
        # the work is saved: a stop signal from now on is moot. Ignore it, or it meets the default action
        # (Python restores it at exit, while MPI_Finalize still runs) and a finished job exits 15, not 0
        ignore_stop_signals()
        if comm.rank == 0 and not summary["stopped"]:
            parts = [f"{summary['steps']} steps in {summary['seconds']:.1f} s",
                     f"{summary['samples_per_s']:,.0f} samples/s"]
            if "test_loss" in summary:
                parts.append(f"test_loss {summary['test_loss']:.4f}")
            if "test_accuracy" in summary:
                parts.append(f"test_accuracy {summary['test_accuracy']:.4f}")
            print("done: " + ", ".join(parts), flush=True)
        # Ctrl-C saved the work, but the run did not finish: say so to the shell as it expects (130)
        return INTERRUPT_EXIT_CODE if summary["stop_signal"] == "SIGINT" else 0
    return _guarded(command)


def _train_arguments(args) -> None:
    """Complete `train`'s arguments: `train --resume CONFIG.toml` is a resume of that config (the flag,
    taking an optional PATH, took the config); no config at all leaves args.config None (the default)."""
    if args.config is None and isinstance(args.resume, str) and args.resume.endswith(".toml"):
        args.config, args.resume = args.resume, True


def resume_command(args) -> str:
    """The shell command that continues this run after a stop signal: the same config path as given,
    the same --set and --run-dir arguments, and --resume (the run's latest checkpoint)."""
    words = ["disttrain", "train"] + ([args.config] if args.config is not None else [])
    for text in args.set:
        words += ["--set", text]
    if args.run_dir:
        words += ["--run-dir", args.run_dir]
    return shlex.join(words + ["--resume"])


# ---------------------------------------------------------------------------------- eval, export
def _eval(args) -> int:
    from . import checkpoint
    from .config import parse_override, validate
    from .distributed import DataParallel
    from .threads import apply_threads, choose_threads
    from .training import build_run
    from .training.evaluation import evaluate

    def command(comm):
        _, manifest, path = checkpoint.read_model(args.path) if comm.rank == 0 else (None, None, None)
        manifest, path = comm.broadcast_object((manifest, path))
        raw = manifest.get("extra", {}).get("config")
        if not raw:
            raise checkpoint.CheckpointError(f"{path}: records no config to rebuild the model from")
        for text in args.set:
            section, key, value = parse_override(text)
            raw.setdefault(section, {})[key] = value
        config = validate(raw, f"config recorded in {path}")
        model, _, test, loss_fn, info = build_run(config, comm)
        apply_threads(choose_threads(comm.node_topology()["local_size"], config["training"]["threads"])[0])
        ddp = DataParallel(model, comm)
        checkpoint.load(path, ddp, None, comm)
        result = evaluate(ddp, test, loss_fn, comm, info["task"], config["training"]["eval_batch_size"])
        if comm.rank == 0:
            print(f"{path}: step {manifest['step']}, " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return 0
    return _guarded(command)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _sample(args) -> int:
    """Print generated text on rank 0 of a launched job only (serial: MPI is never initialised here)."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .generate import sample_command

    if launcher_rank() != 0:
        return 0
    try:
        sample_command(args.path, args.prompt, args.tokens, args.temperature, args.top_k, args.seed)
    except (CheckpointError, ConfigError, ValueError, OSError) as error:
        return _fail(None, error)
    return 0


def _export(args) -> int:
    """Write the .npz on rank 0 of a launched job only (serial: MPI is never initialised here), so that
    `mpiexec -n N disttrain export` does not have N processes writing one file."""
    import numpy as np

    from . import checkpoint

    if launcher_rank() != 0:
        return 0
    try:
        params, manifest, path = checkpoint.read_model(args.path)
        arrays = dict(params)
        if args.optimizer:
            state = checkpoint.consolidated_optimizer_state(path, manifest)
            for key, per_param in state.items():
                arrays.update({f"optimizer.{key}.{name}": value for name, value in per_param.items()})
            # the optimizer's scalars (Adam's step count), as 0-d arrays
            arrays.update({f"optimizer.{key}": np.asarray(value)
                           for key, value in manifest["optimizer"].get("scalars", {}).items()})
        if os.path.isdir(args.output):
            raise checkpoint.CheckpointError(f"export: the output {args.output!r} is a directory; give a file name, "
                                             f"e.g. {os.path.join(args.output, 'model.npz')}")
        temporary = f"{args.output}.tmp-{os.getpid()}"
        try:
            with open(temporary, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(temporary, args.output)
        finally:
            if os.path.lexists(temporary):
                os.remove(temporary)
    except checkpoint.CheckpointError as error:
        return _fail(None, error)
    except OSError as error:
        return _fail(None, f"export: cannot write {args.output}: {error.strerror or error}")
    print(f"wrote {args.output}: {len(params)} parameter arrays from {path} (step {manifest['step']})"
          + (", with optimizer state" if args.optimizer else ""))
    return 0


# ------------------------------------------------------------------------------------- plot, info
def _plot(args) -> int:
    """Write the PNG on rank 0 of a launched job only (see _export)."""
    from .plotting import PlotError, plot

    if launcher_rank() != 0:
        return 0
    try:
        output = plot(args.path, args.output)
    except PlotError as error:
        return _fail(None, error)
    print(f"wrote {output}")
    return 0


def _info(args) -> int:
    def command(comm):
        import platform

        import numpy as np

        from . import __version__
        from .threads import apply_threads, blas_info, choose_threads

        topology = comm.node_topology()
        threads, why = choose_threads(topology["local_size"])
        apply_threads(threads)
        per_rank = comm.allgather_object((comm.rank, topology["node_index"], threads))
        if comm.rank != 0:
            return 0
        print(f"disttrain {__version__}; Python {platform.python_version()}; numpy {np.__version__}")
        print(f"MPI: {comm.library_version()}")
        print(f"world size: {comm.size}; nodes: {topology['nodes']} ({', '.join(topology['hostnames'])}); "
              f"ranks on this node: {topology['local_size']}")
        print(f"BLAS threads per rank: {threads} ({why})")
        for rank, node, rank_threads in per_rank:
            print(f"  rank {rank}: node {node}, {rank_threads} BLAS thread(s)")
        for pool in blas_info():
            print(f"BLAS: {pool['library']} {pool['version']} ({pool['api']}), {pool['threads']} thread(s)")
        return 0
    return _guarded(command)


def _print_schema() -> int:
    from .config import describe

    print(describe())
    return 0

