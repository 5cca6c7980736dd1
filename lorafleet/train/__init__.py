"""Running training jobs on Ray; `lorafleet.pipeline` decides what runs and records the results.

- `runner`: a fleet's jobs on Ray (`FleetExecution`): warm slots for the jobs that can share one,
  a Ray Train run of its own for each other job (`run_job`), cancellation (`cancel`).
- `slot`: a warm slot, one long-lived Ray Train run training queued jobs packed on one base copy.
- `pool`: the cluster's warm slots kept between submissions, from any process (`packing.keep_warm_s`).
- `packed`: the packed trainer a slot runs (K adapters per step on one frozen base).
- `worker`: the per-worker trl QLoRA loop of a job's own run, and `JobPlan`.
- `progress`: the fleet's board actor (live state, cancellation, the slots' queue).
- `raytrain`: the Ray Train run of a slot or a job, with only the processes it needs.
- `cluster_actors`: the actors all runs share, one per cluster (a placement-group cleaner, Ray
  Train's autoscaling coordinator).
- `checkpoints`: a slot job's checkpoints in the storage path, in a job run's layout.
"""
