"""mmgrow.scaling"""
