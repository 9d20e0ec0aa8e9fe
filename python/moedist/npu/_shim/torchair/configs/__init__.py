"""torchair.configs (moedist stand-in)."""
