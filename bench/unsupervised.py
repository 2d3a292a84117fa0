"""The unsupervised protocol (BENCHMARKS.md): medmnist-4 with labels withheld, the selfsup method.

    .venv/bin/python bench/unsupervised.py --baseline [--epochs 10] [--tag run]

A plain one-thread torch loop (the trainer's optimiser, warm-up and cosine schedule, natural
sampling order, labels and organs passed as -1) rather than Ray Train, so the figure isolates
the method. Scored in the BENCHMARKS.md gallery order (``default_rng(12345)`` permutation,
ties by position). ``--baseline`` also scores 48-bit PCA-ITQ in the same order.
"""

import argparse
import copy
import json
import math
import time

import numpy as np
import torch

from medret.eval.benchmarks import Part, RetrievalSplit, medmnist4
from medret.eval.retrieval import hamming_rank, score
from medret.methods import METHODS
from medret.methods.base import TaskInfo
from medret.models.codes import pack_bits
from medret.models.itq import PCAITQ, itq_projection
from medret.train.data import to_tensor

torch.set_num_threads(1)
p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--arch", default="{}")
p.add_argument("--hyper", default="{}")
p.add_argument("--fine", type=int, default=0)
p.add_argument("--lr", type=float, default=None)
p.add_argument("--batch", type=int, default=256)
p.add_argument("--tag", default="run")
p.add_argument("--baseline", action="store_true")
a = p.parse_args()

split = medmnist4()
g = split["gallery"]
perm = np.random.default_rng(12345).permutation(len(g))
shuf = RetrievalSplit(
    split.organs, {**split.parts, "gallery": Part(g.images[perm], g.organ[perm], g.label[perm], g.source[perm])}
)


def evaluate(gc, qc):
    r = score(hamming_rank(qc, gc, 100), shuf, (10, 100))
    return {
        "micro": round(r["micro"]["mAP@100"], 4),
        "macro": round(r["macro"]["mAP@100"], 4),
        "per_organ": {o: round(v["mAP@100"], 3) for o, v in r["per_organ"].items()},
    }


if a.baseline:
    enc = PCAITQ.fit(split["train"].images, bits=48)
    print(
        "pca-itq 48 shuffled",
        evaluate(enc.encode(shuf["gallery"].images), enc.encode(shuf["query"].images)),
        flush=True,
    )

M = METHODS.get("selfsup")
d = M.defaults
arch = {**d["arch"], **json.loads(a.arch)}
torch.manual_seed(0)
task = TaskInfo(bits=48, n_classes=1, n_organs=1, fine_bits=a.fine)
m = M(task, d["architecture"], arch, json.loads(a.hyper))
train = split["train"].images
bs, steps = a.batch, len(train) // a.batch
lr = a.lr or d["lr"]
opt = torch.optim.AdamW(m.param_groups(lr), weight_decay=d["weight_decay"])
total, warm = a.epochs * steps, max(1, steps // 2)
sched = torch.optim.lr_scheduler.LambdaLR(
    opt,
    lambda s: (
        (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))
    ),
)
dummy = torch.full((bs,), -1, dtype=torch.long)


def codes(net, images):
    net.eval()
    with torch.inference_mode():
        out = [net.forward_code(to_tensor(images[i : i + 2048])) for i in range(0, len(images), 2048)]
    return torch.cat([o[0] for o in out]).numpy(), torch.cat([o[1] for o in out]).numpy()


def report(epoch, t_train):
    net = copy.deepcopy(m.encoder)
    if a.fine:
        s = np.random.default_rng(0).choice(len(train), 10000, replace=False)
        f, _ = codes(net, train[np.sort(s)])
        net.fit_fine(torch.from_numpy(f))
    gf, gc = codes(net, shuf["gallery"].images)
    qf, qc = codes(net, shuf["query"].images)
    res = {"tag": a.tag, "epoch": epoch, "train_s": round(t_train), "codes": evaluate(pack_bits(gc), pack_bits(qc))}
    if epoch == a.epochs - 1:  # diagnostics: ITQ of backbone features alone at 48 bits, bit balance of codes
        s = np.random.default_rng(0).choice(len(train), 10000, replace=False)
        f, c = codes(net, train[np.sort(s)])
        mean, proj = itq_projection(f, 48)
        res["itq48_features"] = evaluate(pack_bits((gf - mean) @ proj), pack_bits((qf - mean) @ proj))
        med = np.median(c, axis=0)
        res["median_threshold"] = evaluate(pack_bits(gc - med), pack_bits(qc - med))
        res["bit_mean_abs"] = round(float(np.abs(np.sign(c).mean(0)).mean()), 3)
    print(json.dumps(res), flush=True)


t_train = 0.0
for epoch in range(a.epochs):
    m.train()
    idx = np.random.default_rng(epoch).permutation(len(train))
    sums = {}
    t0 = time.perf_counter()
    for s in range(steps):
        x = to_tensor(train[idx[s * bs : (s + 1) * bs]])
        loss, logs = m(x, dummy, dummy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        m.after_step()
        for k, v in {"loss": loss, **logs}.items():
            sums[k] = sums.get(k, 0) + float(v.detach())
    t_train += time.perf_counter() - t0
    print(
        json.dumps(
            {
                "epoch": epoch,
                **{k: round(v / steps, 4) for k, v in sums.items()},
                "epoch_s": round(time.perf_counter() - t0),
            }
        ),
        flush=True,
    )
    if epoch in (a.epochs // 2, a.epochs - 1):
        report(epoch, t_train)
torch.save(m.state_dict(), f"{a.tag}.pt")
