"""mmgrow.ops"""
