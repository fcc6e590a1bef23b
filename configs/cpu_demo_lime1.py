# CPU demo, LIME+1 arm: configs/cpu_demo.py with position t seeing the POS/NER tags of token t+1.
# python train.py configs/cpu_demo_lime1.py
exec(open(__file__.replace('cpu_demo_lime1.py', 'cpu_demo.py')).read())
out_dir = 'out-cpu-demo-lime1'
meta_shift = 1
