"""mmgrow.growth"""
