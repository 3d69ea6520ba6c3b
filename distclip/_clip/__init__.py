r"""The clip's stages, one module each, in the order every clip runs them (`pipeline` runs them in sequence):

    gradients -> layout (layout, modules: who holds which piece, who counts it, over which group)
              -> local partials (partials: this rank's norms, torch's foreach kernels per device/dtype)
              -> one reduction (row: the row every rank sends; reduction: the only caller of torch.distributed)
              -> total norm (total_norm) -> coefficient (coefficient) -> in-place scaling (scaling)

``arguments`` converts and checks every entry point's arguments; ``foreach`` and ``threads`` choose the kernels.
Nothing here imports from the layers above (the functional API, the clipping service, the integrations, the tools).
"""
