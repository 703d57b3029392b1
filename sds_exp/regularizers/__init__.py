"""Sparse regularisers of SDS step 2 (Eq. 3 of the paper): L1 and L2 penalties on the weights."""
