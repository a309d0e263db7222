"""Checkpoint formats as training frameworks write them.

Each module here reads one on-disk layout from metadata first (which tensors there are, their
dtypes and shapes, and where each one's bytes lie) and then the tensors a caller asks for, by
byte range, so that a checkpoint holding the whole training state is read for its model
tensors only:

    pickles   the restricted unpickler every pickled metadata file goes through
    dcp       torch.distributed.checkpoint directories (``.metadata`` + ``__R_I.distcp``), as
              torchtitan, OLMo-core, Megatron-Core, Lightning and accelerate (FSDP) write them
    torchsave files written by ``torch.save`` (nanoGPT's ``ckpt.pt``, litgpt's ``lit_model.pth``,
              DeepSpeed's model states, Megatron's ``common.pt``)
    mapping   a framework's tensors as a transformers architecture's parameters, checked whole
    nanogpt   nanoGPT's ``ckpt.pt`` as a transformers GPT-2
"""
