"""Analysis tools on maskkit models: contextualization (Kobayashi et al. 2021, 2024)."""
