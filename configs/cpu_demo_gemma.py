# CPU demo on the Gemma-style model: configs/cpu_demo.py (LIME, POS + NER) with arch='gemma'
# (rotary positions, RMSNorm, GeGLU, no biases, sqrt(d)-scaled tied embeddings) and grouped-query
# attention: the 4 query heads share 2 key/value heads. Same data, steps and batches.
# python train.py configs/cpu_demo_gemma.py
#   baseline: --metadata='' --out_dir=out-cpu-demo-gemma-baseline
#   LIME+1:   --meta_shift=1 --out_dir=out-cpu-demo-gemma-lime1
include('cpu_demo.py')  # its settings first, then this file's (common.exec_config)
out_dir = 'out-cpu-demo-gemma-lime'
arch = 'gemma'
n_kv_head = 2
