print('build output')
