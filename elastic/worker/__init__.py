"""The worker API: what a training loop imports to run under elasticd (one import).

    import elastic.worker

    run = elastic.worker.init()                       # process group, config, daemon channel
    run.track(model=model, optim=optimizer)           # checkpointed, resharded on restore
    sampler = run.sampler(len(dataset), global_batch_size=64)
    for step in run.steps(total_steps):               # restore, step boundaries, exit code
        batch = [dataset[i] for i in sampler.local_indices(step)]
        loss = ...; loss.backward(); grad_norm = clip_grad_norm_(...)
        if run.report(loss=loss, grad_norm=grad_norm).apply:
            optimizer.step()
        optimizer.zero_grad()
    raise SystemExit(run.finish())

Under the daemon the run reads its config from the file the daemon wrote, beats for the
watchdog, takes drain/pause/resume/rewind requests at step boundaries and exits with the
protocol's codes. Under plain torchrun or by hand (one process) the same loop runs with the
defaults or ``init(config="job.yaml")``. See docs/worker-api.md.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping

from elastic import jsonlog
from elastic.channel import WorkerChannel
from elastic.config import ConfigError
from elastic.protocol import Env, Event, ExitCode, Phase
from elastic.worker import config as _config
from elastic.worker import dist
from elastic.worker.config import RunConfig
from elastic.worker.run import Run, StepVerdict
from elastic.worker.sampler import ElasticSampler

__all__ = [
    "ElasticSampler",
    "Event",
    "ExitCode",
    "Phase",
    "Run",
    "RunConfig",
    "StepVerdict",
    "init",
]


def init(
    config: str | RunConfig | None = None,
    *,
    device: str = "auto",
    environ: Mapping[str, str] | None = None,
    fingerprints: Mapping[str, str] | None = None,
) -> Run:
    """Set up this worker: config, the daemon channel, the process group, JSON logging.

    ``config``: a YAML path or a built :class:`RunConfig`; by default the file the daemon
    wrote (``ELASTICD_WORKER_CONFIG``), else the defaults. ``device``: ``auto`` (CUDA when
    present), ``cuda`` or ``cpu``. A bad config exits the process with ``ExitCode.CONFIG``
    after one line on stderr naming the key and the value.
    """
    env = os.environ if environ is None else environ
    started = time.monotonic()
    channel = WorkerChannel(env.get(Env.WORKER_DIR), local_rank=int(env.get("LOCAL_RANK", "0")))
    # Before the process group forms: a rendezvous that never completes is watched (start-up
    # timeout) from here on.
    channel.beat(0, Phase.START)
    try:
        run_config = config if isinstance(config, RunConfig) else _config.load(config, environ=env)
    except ConfigError as exc:
        print(f"elasticd: invalid config: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(int(ExitCode.CONFIG)) from None
    configured = time.monotonic()
    info = dist.init(env, device_preference=device)
    jsonlog.configure(run_id=run_config.run_id, node=env.get(Env.NODE), rank=info.rank)
    startup = {
        "config_seconds": round(configured - started, 3),
        "process_group_seconds": round(time.monotonic() - configured, 3),
    }
    return Run(run_config, info, channel=channel, fingerprints=fingerprints, startup=startup)
