"""Every stage's figures: bits per dimension or per code, the VQ-VAE's reconstructions, sample
metrics (CAS, local FID / KID, Inception FID) and their classifier, the codecs' yardstick, and the
HTML report."""
