"""The model-file contract: loading and running the TorchScript model, the one preprocessing
function it was trained with, its saliency grid, its intended use and a site's threshold bound
to the file."""
