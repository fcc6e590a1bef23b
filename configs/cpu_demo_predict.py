# CPU demo, self-predicting LIME+1 arm: configs/cpu_demo.py on causal tags, with the model predicting
# the next token's POS/NER tags itself (no oracle: it generates without hints, hints override it).
# python train.py configs/cpu_demo_predict.py
include('cpu_demo.py')  # its settings first, then this file's (common.exec_config)
out_dir = 'out-cpu-demo-predict'
metadata = 'pos_causal,ner_causal'
meta_predict = True
meta_inject_layer = 2  # of 4 layers (the default n_layer // 2)
