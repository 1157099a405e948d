"""Synthetic demo data: a small H&E-like cohort with hidden variables (`cohort.make_cohort`), and the small
specialist expert encoders the demo distils from (`experts`)."""
