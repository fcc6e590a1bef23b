# CPU demo, baseline arm: configs/cpu_demo.py without metadata (same data, model, steps and batches).
# python train.py configs/cpu_demo_baseline.py
include('cpu_demo.py')  # its settings first, then this file's (common.exec_config)
out_dir = 'out-cpu-demo-baseline'
metadata = ''
