"""What every Tandem package shares: the batch protocol, the typed config schema, `ModelArgs`,
the `Registry`, distributed set-up, megatron layer specs and the CPU compatibility layer."""

import warnings

# megatron-core announces at import that optional fused kernels (apex, transformer-engine) are
# absent; Tandem's own specs do not use them, so the notice is noise in every run's log.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")
