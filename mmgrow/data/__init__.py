"""mmgrow.data"""
