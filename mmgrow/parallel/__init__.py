"""mmgrow.parallel"""
