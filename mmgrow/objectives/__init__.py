"""mmgrow.objectives"""
