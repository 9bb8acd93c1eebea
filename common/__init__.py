"""What every part shares and nothing else: the layer below actors/, rewards/ and learner/.

- records.py: the one record type that crosses process boundaries (samples, sampling settings).
- weight_sync.py: both halves of moving weights from the learner to the engines, and their
  bucket plan (the driver's side of the protocol is cluster/weight_sync.py).
- config.py: the config error and the field helper every config section is declared with.
- net.py: a free TCP port (rendezvous of the learner ranks and of the weight-sync group).

Nothing here imports another r1ray package (tests/test_layers.py).
"""
