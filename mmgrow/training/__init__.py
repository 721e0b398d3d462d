"""mmgrow.training"""
