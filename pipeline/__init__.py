"""Training stage: GLUE data files, the dense teacher, and the pruned-while-distilled student."""
