"""Files a run or a lineage owns: safe reads of regular files (`paths`), content manifests (`manifest`) and the
one-writer locks (`locks`). The floor under data, checkpoints and the lineage: it imports nothing of lmadapt."""
