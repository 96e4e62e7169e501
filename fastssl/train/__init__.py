"""Training loops: pretraining (fastssl.train.pretrain) and curation jobs."""
