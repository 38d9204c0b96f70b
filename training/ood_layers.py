"""Which layers the out-of-distribution score should use: abstention rates of one member's
Mahalanobis score from its last layer alone, and with the channel means after its first,
second or third max-pool added (each fitted on the member's training films, threshold at the
validation split's 0.985 quantile), on the stress shifts, heavy shifts and synthetic pictures.

`.venv/bin/python training/ood_layers.py runs/robust-s0` (about 8 minutes on 2 cores; the
figures in docs/generalisation.md). A study script, not part of the training command.
"""
import json
import sys

import numpy as np
import torch

RUN = sys.argv[1] if len(sys.argv) > 1 else 'runs/robust-s0'
from pathlib import Path

from torch import nn

torch.set_num_threads(1)
from pacs_ai.model.preprocessing import to_model_input
from training.abstention import HEAVY_SHIFTS, synthetic_pictures
from training.data import DEFAULT_CACHE_DIR, load_split
from training.ensemble import fit_gaussians, load_member
from training.shifts import CONDITIONS
from training.stress import cached_shifted_inputs, validation_files

net, cfg = load_member(Path(RUN))
layers=list(net); flatten=max(i for i,l in enumerate(layers) if isinstance(l, nn.Flatten))
pools=[i for i,l in enumerate(layers[:flatten]) if isinstance(l, nn.MaxPool2d)]
taps = {'p1': pools[0], 'p2': pools[1], 'p3': pools[2]}
@torch.inference_mode()
def feats(inputs):
    out={'final':[], 'p1':[], 'p2':[], 'p3':[]}
    for i in range(0,len(inputs),128):
        x=torch.from_numpy(np.asarray(inputs[i:i+128],np.float32)).reshape(-1,1,200,200)
        for j,l in enumerate(layers[:flatten+1]):
            x=l(x)
            for k,t in taps.items():
                if j==t: out[k].append(x.mean((2,3)).numpy())
        out['final'].append(x.numpy())
    return {k:np.concatenate(v) for k,v in out.items()}
split=json.load(open(RUN + '/split.json'))
imgs=load_split(Path('../shared/data/chest_xray'),'train',progress=False,names=set(split['train'])|set(split['validation']))
idx={p.name:i for i,p in enumerate(imgs.paths)}
tr=imgs.subset([idx[n] for n in split['train']]); va=imgs.subset([idx[n] for n in split['validation']])
ftr=feats(tr.inputs)
fits={k:fit_gaussians(v,tr.labels) for k,v in ftr.items()}
def score(f,k):
    m,P=fits[k]; d=np.stack([np.einsum('nd,de,ne->n',f-mu,P,f-mu) for mu in m],1).min(1)/f.shape[1]; return d
combos={'final':['final'],'final+p2':['final','p2'],'final+p1':['final','p1'],'final+p3':['final','p3'],'final+p1+p2':['final','p1','p2']}
def combo_scores(f):
    return {c:sum(score(f[k],k) for k in ks) for c,ks in combos.items()}
fva=feats(va.inputs); sva=combo_scores(fva)
th={c:np.quantile(s,0.985) for c,s in sva.items()}
rows={}
paths,_=validation_files(Path(RUN) / 'split.json',Path('../shared/data/chest_xray'))
for cond in list(CONDITIONS)+list(HEAVY_SHIFTS):
    inp=cached_shifted_inputs(paths,cond,None if cond.group=='heavy' else DEFAULT_CACHE_DIR)[:,0]
    s=combo_scores(feats(inp)); rows[cond.name]={c:float((s[c]>th[c]).mean()) for c in combos}
for name,pics in synthetic_pictures().items():
    s=combo_scores(feats(np.stack([to_model_input(p)[0] for p in pics]))); rows['syn-'+name]={c:float((s[c]>th[c]).mean()) for c in combos}
print('cond'.ljust(18), ' '.join(c.rjust(12) for c in combos))
for r,v in rows.items(): print(r.ljust(18), ' '.join(f'{v[c]:12.3f}' for c in combos))
