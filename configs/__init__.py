"""Policy presets, one TOML file each (read by pi0_triton_policy.presets; packaged as pi0_triton_policy.configs)."""
