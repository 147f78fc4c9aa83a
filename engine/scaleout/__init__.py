"""Scale-out beyond one engine: `engine serve --replicas N` runs the fal/OpenAI HTTP surface in this process (one job
queue and job store, so status/result/cancel work whichever replica ran a job) and the engines in Ray Serve
replicas (one `Engine` each). Ray is an optional extra (`pip install 'engine[ray]'`): nothing here imports it at
module import time; `worker.py` (the Serve deployment) is imported only when replicas are started.

  keys.py      request -> adapter-set key (the routing id) and batch key (what may share a model call)
  batching.py  an asyncio batcher: same-key requests arriving within a short window run as one batch
  batched.py   Engine.generate_batch: one diffusers call for a batch, one seeded generator per request
  remote.py    RemoteEngine: the Engine-shaped proxy the ingress's queue drives; routes by adapter set
  worker.py    the Ray Serve deployment (one Engine per replica, health check, per-replica counters); it runs
               each job under the ingress caller's policy and sends engine errors back as data
  serve.py     start Ray + the deployment and build the ingress app (`engine serve --replicas`)
  parallel.py  multi-GPU for one request: which diffusers parallelism fits a family and the visible devices
  cfg_parallel.py  CFG-parallel for UNets: each batch in halves on two devices of one process (hook pair + copy)
"""
