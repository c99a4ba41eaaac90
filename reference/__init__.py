"""The PyTorch reference of the table-free model family: config, lift, model, checkpoints.

Import the submodules you need; this package file stays light so that config and tokenizer
tooling load without torch.
"""
