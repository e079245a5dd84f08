"""The operational side of a run directory, used by `lmadapt.trainer`: which checkpoint a restart resumes from
and whether it is intact (`resume`), stop signals (`stopflag`, light enough to import before JAX), guards on
disks, peers and non-finite steps (`guards`), the metrics log (`logs`), and scoring a run's checkpoint
read-only (`scoring`, what `eval.py --run` does)."""
