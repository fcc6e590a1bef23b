# CPU demo, LIME+1 arm: configs/cpu_demo.py with position t seeing the POS/NER tags of token t+1.
# python train.py configs/cpu_demo_lime1.py
include('cpu_demo.py')  # its settings first, then this file's (common.exec_config)
out_dir = 'out-cpu-demo-lime1'
meta_shift = 1
