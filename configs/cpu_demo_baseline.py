# CPU demo, baseline arm: configs/cpu_demo.py without metadata (same data, model, steps and batches).
# python train.py configs/cpu_demo_baseline.py
exec(open(__file__.replace('cpu_demo_baseline.py', 'cpu_demo.py')).read())
out_dir = 'out-cpu-demo-baseline'
metadata = ''
