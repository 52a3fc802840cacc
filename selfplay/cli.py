"""The `selfplay` command line.

  selfplay demo     self-play on the embedded tiny model and synthetic task on a local Ray cluster
  selfplay run      the same driver on any config (real models, prompt sets, cluster resources)
  selfplay submit   submit a command as a Ray job (working dir + env in its runtime_env); `selfplay job` follows it
  selfplay warmup   build the policy (the embedded tiny model by default), run the supervised warm-up and
                    print its held-out task score before and after
  selfplay eval     win rate of policy A against policy B on held-out prompts, with any judge
  selfplay config   validate a config and print it fully resolved
  selfplay tiny     build the embedded tiny model + tokenizer and save them as a Hugging Face checkpoint
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """A mistake in the command line or its inputs: one line on stderr, exit status 2, no traceback."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the whole usage block; one line says what is wrong
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


RAY_PROBE_S = 5.0  # a named Ray cluster that does not answer within this long is reported, not retried


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file (default: built-in defaults = the embedded demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set warmup.steps=80 (repeatable)")


def _add_address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="join the running Ray cluster at HOST:PORT (default: $RAY_ADDRESS, which a "
                   "Ray job sets; otherwise a fresh local cluster for this run only)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="selfplay",
        description="Self-play preference optimization (SPPO, SAPO, SRPO) for language models on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("demo", help="self-play on the tiny model + sort task, local Ray; prints win rate vs initial")
    p.add_argument("--algorithm", choices=["sppo", "sapo", "srpo"], default="sppo")
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--quick", action="store_true", help="a few steps only (for smoke tests)")
    p.add_argument("--out", help="output directory (default runs/demo-<algorithm>-<mode>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_address_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run self-play from a config file, or resume a stopped run")
    p.add_argument("config", nargs="?", help="YAML config (see configs/); not needed with --resume")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="output directory (default: out_dir from the config)")
    p.add_argument("--resume", metavar="DIR|auto",
                   help="continue the run in DIR from its newest complete checkpoint (its config.yaml, plus --set); "
                   "'auto': resume the run in --out (or out_dir) if it has a checkpoint, otherwise start it (what a "
                   "retried Ray job or Slurm requeue runs)")
    _add_address_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit a command as a Ray job, e.g. selfplay submit -- selfplay run CONFIG")
    p.add_argument("--address", help="Ray job server (default $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--working-dir", default=".", help="uploaded with the job (.venv, runs/, .git excluded)")
    p.add_argument("--no-upload", action="store_true", help="upload nothing: the code is on every node already "
                   "(the cluster's image, a shared filesystem); give the job's paths as the nodes see them")
    p.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable); WANDB_*/HF_* pass through when set")
    p.add_argument("--id", dest="submission_id", help="submission id (default: generated)")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish and exit with its status")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the job's command")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("job", help="status, logs or stop of a submitted job")
    p.add_argument("action", choices=["status", "logs", "stop", "wait"])
    p.add_argument("submission_id")
    p.add_argument("--address")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("plan", help="recommend a generator:learner layout from measured per-actor costs")
    p.add_argument("--gpus", type=float, required=True, help="GPUs in the cluster")
    p.add_argument("--gen-seconds", type=float, required=True, help="seconds for one generator request")
    p.add_argument("--rows-per-request", type=float, required=True, help="replay rows one request yields")
    p.add_argument("--train-seconds", type=float, required=True, help="seconds for one step on one learner")
    p.add_argument("--batch", type=int, required=True, help="rows per learner step (train.batch_size)")
    p.add_argument("--generator-gpus", type=float, default=1)
    p.add_argument("--learner-gpus", type=float, default=1)
    p.add_argument("--judges", type=int, default=1)
    p.add_argument("--judge-gpus", type=float, default=1)
    p.add_argument("--learner-efficiency", type=float, default=0.9, help="data-parallel efficiency per extra learner")
    p.add_argument("--sync-seconds", type=float, default=0.0, help="learner time per weight push")
    p.add_argument("--sync-every", type=int, default=1)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("warmup", help="build the initial policy, warm it up, print its held-out task score")
    _add_config_args(p)
    p.add_argument("--out", help="directory for the warmed-up policy and warmup.json (default: <out_dir>/warmup)")
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("eval", help="win rate of policy A vs policy B on held-out prompts (table + JSON)")
    _add_config_args(p)
    p.add_argument("--policy-a", required=True, help="checkpoint directory, hub id, or 'tiny' (random init)")
    p.add_argument("--policy-b", help="the opponent, same forms as --policy-a (not with --export)")
    p.add_argument("--export", nargs=2, metavar=("FORMAT", "DIR"),
                   help="write policy A's answers instead of judging: alpaca_eval → DIR/model_outputs.json "
                        "(instruction, output, generator), for alpaca_eval --model_outputs")
    p.add_argument("--generator", help="--export: the model's name in the outputs (default: policy A's directory name)")
    p.add_argument("--revisions", type=int, default=0,
                   help="SRPO inference: N rounds of self-revision before judging (default 0)")
    p.add_argument("--prompts", type=int, help="number of held-out prompts (default: task.eval_size)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of generation.temperature")
    p.add_argument("--out", help="write the result as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("config", help="validate a config and print it fully resolved")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("tiny", help="save the embedded tiny model + tokenizer as a Hugging Face checkpoint")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)
    return parser


def _version() -> str:
    from selfplay import __version__

    return __version__


def _run_driver(cfg, out: str, address: str | None, resume: bool = False) -> int:
    """Check every input, then start (or join) Ray and run. Nothing starts when an input is wrong."""
    import os

    from selfplay.preflight import check_run

    address = address or os.environ.get("RAY_ADDRESS") or None  # a Ray job sets RAY_ADDRESS to its cluster
    prompts = check_run(cfg, out, resume=resume, local_cluster=address is None)
    if address:
        _check_reachable(address)
    import ray

    from actors.driver import Driver

    started_here = not ray.is_initialized()
    if started_here and address:
        print(f"[selfplay] joining the Ray cluster at {address}", flush=True)
        ray.init(address=address, namespace="selfplay", log_to_driver=False)
    elif started_here:
        print("[selfplay] starting a local Ray cluster for this run", flush=True)
        # "local": never follow /tmp/ray/ray_current_cluster, which a killed head leaves behind
        ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace="selfplay")
    try:
        Driver(cfg, out, prompts=prompts).run(resume=resume)
    finally:
        if started_here:
            ray.shutdown()
    return 0


def _check_reachable(address: str) -> None:
    """Ray retries an address that does not answer for minutes; say so at once, with the way out."""
    import socket

    if address == "auto":  # the cluster `ray start` last recorded on this machine (it may be a dead one)
        from ray._private.services import get_ray_address_from_environment

        try:
            recorded = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            raise UsageError("Ray address 'auto': no Ray cluster is running on this machine; start one (ray start "
                             "--head), or unset RAY_ADDRESS / drop --address to run on a fresh local cluster") from None
        return _check_reachable(recorded)
    if address.startswith(("http://", "https://")):
        raise UsageError(f"Ray address {address!r} is a job server (dashboard) address; to run there use "
                         "`selfplay submit --address URL -- selfplay run CONFIG`, or give the cluster's HOST:PORT")
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"Ray address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_PROBE_S).close()
    except OSError as e:
        raise UsageError(f"Ray at {address} does not answer ({e.strerror or e}; tried for {RAY_PROBE_S:g}s): start "
                         "the head there (ray start --head), or unset RAY_ADDRESS / drop --address to run on a "
                         "fresh local cluster") from None


def cmd_demo(args) -> int:
    from selfplay.demo import demo_config

    cfg = demo_config(args.algorithm, args.mode, args.quick, args.overrides)
    return _run_driver(cfg, args.out or f"runs/demo-{args.algorithm}-{args.mode}", args.address)


def cmd_run(args) -> int:
    from selfplay.config import load_config

    if args.resume == "auto":
        return _run_auto(args)
    if args.resume:
        if args.config and Path(args.config).resolve() != (Path(args.resume) / "config.yaml").resolve():
            raise UsageError("selfplay run --resume DIR continues with DIR/config.yaml; give --set overrides, "
                             f"not another config ({args.config})")
        config = Path(args.resume) / "config.yaml"
        if not config.exists():
            raise UsageError(f"{config}: not found; --resume {args.resume} is not the output directory of a run")
        return _run_driver(load_config(str(config), args.overrides), args.resume, args.address, resume=True)
    if not args.config:
        raise UsageError("selfplay run: give a config file (or --resume DIR)")
    cfg = load_config(args.config, args.overrides)
    return _run_driver(cfg, args.out or cfg.out_dir, args.address)


def _run_auto(args) -> int:
    """--resume auto: the same command starts a run, or continues it after the job was stopped. The config given
    must be the one the run started with (a changed config is a different run: refused, with the keys)."""
    from selfplay.config import load_config
    from selfplay.preflight import latest_checkpoint

    if not args.config:
        raise UsageError("selfplay run --resume auto: give the config file too (it starts the run when there is "
                         "nothing to resume)")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or cfg.out_dir)
    if not (out / "config.yaml").is_file() or latest_checkpoint(out) is None:
        if out.exists() and any(out.iterdir()):
            print(f"[selfplay] --resume auto: {out} has no complete checkpoint; starting the run anew", flush=True)
        return _run_driver(cfg, str(out), args.address)
    stored = load_config(str(out / "config.yaml"), args.overrides)
    changed = _differences(stored.to_dict(), cfg.to_dict(), skip={"out_dir"})
    if changed:
        shown = ", ".join(f"{k} ({a!r} there, {b!r} here)" for k, a, b in changed[:5])
        raise UsageError(f"selfplay run --resume auto: {args.config} differs from {out / 'config.yaml'}, the run it "
                         f"would resume, at {shown}; resume that run with --resume {out} (and --set), or start "
                         "another with a new --out")
    return _run_driver(stored, str(out), args.address, resume=True)


def _differences(a: dict, b: dict, skip: set[str], prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in sorted(set(a) | set(b)):
        name = prefix + key
        if name in skip:
            continue
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out.extend(_differences(a[key], b[key], skip, name + "."))
        elif a.get(key) != b.get(key):
            out.append((name, a.get(key), b.get(key)))
    return out


def cmd_submit(args) -> int:
    from deploy import submit as jobs

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    env = {}
    for item in args.env:
        if "=" not in item:
            raise UsageError(f"--env {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        env[key] = value
    sid = jobs.submit(command, address=args.address, working_dir=None if args.no_upload else args.working_dir,
                      pip=args.pip or None, env=env,
                      submission_id=args.submission_id)
    print(f"submitted {sid}; follow it with: selfplay job logs {sid}")
    if not args.wait:
        return 0
    final = jobs.wait(sid, address=args.address, log=print)
    print(jobs.logs(sid, args.address)[-4000:])
    print(f"job {sid}: {final}")
    return 0 if final == "SUCCEEDED" else 1


def cmd_job(args) -> int:
    from deploy import submit as jobs

    if args.action == "status":
        print(jobs.status(args.submission_id, args.address))
    elif args.action == "logs":
        print(jobs.logs(args.submission_id, args.address), end="")
    elif args.action == "stop":
        print("stopped" if jobs.stop(args.submission_id, args.address) else "not running")
    else:
        final = jobs.wait(args.submission_id, address=args.address, log=print)
        print(final)
        return 0 if final == "SUCCEEDED" else 1
    return 0


def cmd_plan(args) -> int:
    from selfplay.plan import Costs, describe, plan

    for name in ("gpus", "gen_seconds", "rows_per_request", "train_seconds", "batch", "sync_every"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name):g}")
    costs = Costs(args.gen_seconds, args.rows_per_request, args.train_seconds, args.batch,
                  args.learner_efficiency, args.sync_seconds, args.sync_every)
    layouts = plan(costs, args.gpus, args.generator_gpus, args.learner_gpus, args.judge_gpus, args.judges)
    if not layouts:
        raise UsageError(f"--gpus {args.gpus:g}: cannot hold a generator, a learner and {args.judges} judge(s)")
    best = layouts[0]
    print(describe(layouts))
    print(f"\nrecommended: resources.num_generators={best.generators} resources.num_learners={best.learners} "
          f"({best.rows_trained_per_s:.2f} rows/s, learner idle {best.learner_idle:.0%}; simulated, see selfplay/plan.py)")
    return 0


def cmd_config(args) -> int:
    from selfplay.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_tiny(args) -> int:
    from selfplay.tiny import build_tiny

    model, tok = build_tiny(args.seed, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny model ({n / 1e6:.2f}M parameters, vocabulary {len(tok)}) saved to {args.out}")
    return 0


def cmd_warmup(args) -> int:
    import torch

    from selfplay.config import PROMPT_SETS, load_config
    from selfplay.models import load_policy_and_tokenizer, save_pretrained
    from selfplay.tasks import make_task
    from selfplay.warmup import evaluate_task, supervised_warmup

    cfg = load_config(args.config, args.overrides)
    if cfg.task.name in PROMPT_SETS:
        raise UsageError("task.name: the warm-up needs a synthetic task with reference answers (task.name: sort)")
    out = Path(args.out or Path(cfg.out_dir) / "warmup")
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model, tok = load_policy_and_tokenizer(cfg.model, cfg.seed)
    task = make_task(cfg.task.name, min_items=cfg.task.min_items, max_items=cfg.task.max_items)
    train = task.prompts("train", cfg.task.train_size, seed=cfg.seed)
    held_out = task.prompts("eval", cfg.task.eval_size, seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"policy {cfg.model.policy!r}: {n_params / 1e6:.2f}M parameters; task {task.name!r}: "
          f"{len(train)} train / {len(held_out)} held-out prompts ({time.perf_counter() - t0:.1f}s)")

    gen = dict(max_new_tokens=cfg.generation.max_new_tokens)
    before = evaluate_task(model, tok, task, held_out, **gen)
    losses = supervised_warmup(model, tok, train, steps=cfg.warmup.steps, batch_size=cfg.warmup.batch_size,
                               lr=cfg.warmup.lr, seed=cfg.seed)
    after = evaluate_task(model, tok, task, held_out, **gen)
    save_pretrained(model, tok, out / "policy")
    result = {
        "task": task.name,
        "policy": cfg.model.policy,
        "warmup_steps": cfg.warmup.steps,
        "final_loss": losses[-1] if losses else None,
        "heldout_before": before,
        "heldout_after": after,
        "seconds": round(time.perf_counter() - t0, 2),
        "policy_dir": str(out / "policy"),
    }
    (out / "warmup.json").write_text(json.dumps(result, indent=2))
    print()
    print(f"{'held-out (' + str(len(held_out)) + ' prompts)':<28}{'task score':>12}{'exact':>10}")
    print(f"{'before warm-up':<28}{before['score']:>12.3f}{before['exact']:>10.3f}")
    print(f"{'after warm-up':<28}{after['score']:>12.3f}{after['exact']:>10.3f}")
    print(f"\nsaved policy to {out / 'policy'} and {out / 'warmup.json'} ({result['seconds']}s)")
    return 0


def cmd_eval(args) -> int:
    import dataclasses

    from selfplay.config import PROMPT_SETS, load_config
    from selfplay.evaluate import head_to_head
    from selfplay.judges import make_judge
    from selfplay.models import load_policy_and_tokenizer
    from selfplay.tasks import load_task_prompts, make_task

    cfg = load_config(args.config, args.overrides)
    if args.revisions < 0:
        raise UsageError(f"--revisions must be >= 0, got {args.revisions}")
    if args.export and args.export[0] not in EXPORT_FORMATS:
        raise UsageError(f"--export {args.export[0]}: unknown format; use one of {', '.join(EXPORT_FORMATS)}")
    if bool(args.export) == bool(args.policy_b):
        raise UsageError("give --policy-b (a head-to-head) or --export FORMAT DIR (policy A's answers), not both"
                         if args.export else "give --policy-b, the opponent (or --export FORMAT DIR)")
    task = None
    if cfg.task.name in PROMPT_SETS:
        prompts = load_task_prompts(cfg.task)
    else:
        task = make_task(cfg.task.name, min_items=cfg.task.min_items, max_items=cfg.task.max_items)
        prompts = task.prompts("eval", cfg.task.eval_size, seed=cfg.seed)
    prompts = prompts[: args.prompts] if args.prompts else prompts
    sampling = dict(max_new_tokens=cfg.generation.max_new_tokens,
                    temperature=0.0 if args.greedy else cfg.generation.temperature, top_p=cfg.generation.top_p)
    if args.export:
        return _export(args, cfg, prompts, sampling)
    judge = make_judge(cfg.judge, cfg.task)
    models = [load_policy_and_tokenizer(dataclasses.replace(cfg.model, policy=p), cfg.seed)
              for p in (args.policy_a, args.policy_b)]
    t0 = time.perf_counter()
    result = head_to_head(models[0][0], models[1][0], models[0][1], models[1][1], prompts, judge, seed=cfg.seed,
                          task=task, revisions=args.revisions, template=cfg.srpo.revision_template, **sampling)
    result.update(policy_a=args.policy_a, policy_b=args.policy_b, judge=cfg.judge.kind,
                  seconds=round(time.perf_counter() - t0, 2))
    print(f"{'':<10}{'policy':<40}{'task score':>12}")
    for side in ("a", "b"):
        score = result[f"task_score_{side}"]
        print(f"{side.upper():<10}{result['policy_' + side][-40:]:<40}{'' if score is None else f'{score:.3f}':>12}")
    print(f"\nA vs B on {result['n']} held-out prompts ({cfg.judge.kind} judge"
          f"{f', {args.revisions} revision rounds' if args.revisions else ''}): "
          f"win rate {result['winrate']:.3f} ± {result['stderr']:.3f}  "
          f"(wins {result['wins']}, ties {result['ties']}, losses {result['losses']})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


EXPORT_FORMATS = ("alpaca_eval",)


def _export(args, cfg, prompts, sampling) -> int:
    """Policy A's answers (the last SRPO revision with --revisions) in AlpacaEval's model_outputs.json."""
    import dataclasses

    from selfplay.evaluate import alpaca_eval_outputs, answer
    from selfplay.models import load_policy_and_tokenizer

    model, tokenizer = load_policy_and_tokenizer(dataclasses.replace(cfg.model, policy=args.policy_a), cfg.seed)
    generator = args.generator or Path(args.policy_a.rstrip("/")).name
    t0 = time.perf_counter()
    texts = answer(model, tokenizer, prompts, revisions=args.revisions, template=cfg.srpo.revision_template,
                   seed=cfg.seed, **sampling).texts
    out = Path(args.export[1]) / "model_outputs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.partial")  # a reader never sees half a file
    partial.write_text(json.dumps(alpaca_eval_outputs(prompts, texts, generator), indent=2, ensure_ascii=False))
    partial.replace(out)
    print(f"wrote {len(texts)} answers of {generator} to {out} ({time.perf_counter() - t0:.0f}s); score them with: "
          f"alpaca_eval --model_outputs {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    import os

    from selfplay.config import ConfigError
    from selfplay.errors import ModelLoadError
    from selfplay.tasks import PromptFileError

    # DeepSpeed is imported indirectly by transformers; without a GPU it warns on every import unless told.
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        return args.func(args)
    except (ConfigError, PromptFileError, ModelLoadError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
