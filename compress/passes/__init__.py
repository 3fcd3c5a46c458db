"""Passes: each step kind has a module `compress/passes/<kind>.py` with `run(artifact, step, ctx) -> Artifact`.

A pass writes only inside `ctx.stage_dir` and returns `artifact.evolve(step_record(step, **effect), ...)`,
where `effect` holds what it measured; the pipeline then saves the returned artifact into `ctx.stage_dir`.
"""
