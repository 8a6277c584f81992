"""What every Tandem package shares: the batch protocol, typed config, distributed set-up,
megatron layer specs, the CPU compatibility layer and the locally built test models."""

import warnings

# megatron-core announces at import that optional fused kernels (apex, transformer-engine) are
# absent; Tandem's own specs do not use them, so the notice is noise in every run's log.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")
